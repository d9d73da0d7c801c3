"""The pack's own small demo models (models.py, assets/), their digit classifiers (classifier.py), a Gaussian
mixture with an exact denoiser (gmm.py) and the training problems built on them (problems.py)."""
