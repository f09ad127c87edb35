"""Pretraining on megatron-core: run config, parallel set-up, data, optimizer, metrics, the loop (docs/training.md)."""
