"""The embedded default: the digits CNN on scikit-learn's digits at a batch large for 1,437 images."""

DESCRIPTION = "digits CNN on the embedded digits, batch 512 (a third of the data per step), SGD, 60 epochs"

PRESET = {
    "model": "digits_cnn",
    "data": "digits",
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr": 0.1,
    "lr_scaling": "linear",
    "base_batch": 200,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "warmup_epochs": 6,
    "batch_size": 512,
    "epochs": 60,
}
