"""The transformers bridge: configs, expected tensors, building models, roles, dtypes."""
