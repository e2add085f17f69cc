"""The model repository: which model versions serve, loaded and retired without a restart."""
