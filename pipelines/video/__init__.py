"""Video jobs: reading videos, the video-QA schema and scorer, the small video model, and ``eval-video``."""
