"""A Flower app in the shape of Flower's PyTorch quickstart, with securemark added in three lines."""
