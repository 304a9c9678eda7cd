"""Applications built on the predictor: tracking and counting in traffic video, live sources."""
