"""Segmentation of the lumbar spine (issue 16), in layers: the label values every mask uses (``labels``), masks and
point maps on the cache grid (``masks``), the SPIDER layout reader and writer (``spider``) and the nnU-Net export
(``nnunet``), all pure cores; the MONAI U-Net and its Ray Train stage sit above them."""
