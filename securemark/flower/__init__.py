"""The Flower layer: the only package that imports flwr. ServerApp and ClientApp on the Message API."""
