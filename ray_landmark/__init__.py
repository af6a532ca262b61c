"""ray_landmark: the Google Landmark Recognition and Retrieval 2021 winning method on Ray."""
