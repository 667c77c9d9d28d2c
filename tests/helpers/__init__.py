"""Helpers shared by several test modules, each defined once (lightning-hydra-template's
tests/helpers): tiny models, batches and the training step (optim), network stand-ins (net),
and the torch.compile probe. Test modules import them as ``from helpers.<module> import …``;
conftest.py keeps only fixtures and the composition of the real configs."""
