"""Level localisation: geometry between series (``geometry``), detections to ordered levels (``levels``); the YOLO
detector comes next."""
