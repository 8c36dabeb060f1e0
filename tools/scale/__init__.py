"""Scale measurements: peak anonymous memory and time of pipeline stages against the image count."""
