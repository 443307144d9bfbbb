"""lumbar_ray."""
