"""ReFT: configs, adapters on a frozen model, data, training."""
