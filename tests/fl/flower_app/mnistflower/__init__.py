"""mnistflower: a Flower app (Message API) that trains a small CNN on MNIST."""
