"""resnetexample: a Flower app training a torchvision-style ResNet-8 (BatchNorm) on digits, with securemark."""
