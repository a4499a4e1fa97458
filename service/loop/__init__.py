"""Learning from traffic: the capture tap, the review queue, the ring of recent inputs."""
