"""Level localisation, in layers: pure cores (``geometry`` between series, ``levels`` from detections to ordered
levels, ``study`` for a study's 25 points, ``evaluate`` against the labels, ``yolo_data`` for the training export),
the ultralytics adapter (``detector``) and the stage that trains on Ray and tracks in MLflow (``stage``)."""
