"""Level localisation: geometry between series (this module's ``geometry``); the YOLO detector comes next."""
