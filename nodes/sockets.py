"""The pack's own ComfyUI socket types and node categories, shared by the node modules."""
from __future__ import annotations

from .compat import io

CATEGORY = "sampling/epd"
TRAINING_CATEGORY = "training/epd"
EPDParamsType = io.Custom("EPD_PARAMS")          # an EPDParams table
EPDRewardType = io.Custom("EPD_REWARD")          # a reward for RL fine-tuning
EPDRLSettingsType = io.Custom("EPD_RL_SETTINGS")  # EPD RL Settings' options for the EPD Trainer
