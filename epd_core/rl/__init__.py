"""RDPO: Residual Dirichlet Policy Optimization, RL fine-tuning of an EPD table on a reward
(docs/method.md, "RL fine-tuning").
Pure torch; never imports ComfyUI."""
from .policy import ResidualDirichletPolicy
from .rdpo import RLCancelled, RLConfig, RLError, rdpo, rloo_advantages
from .rewards import (DemoClassifierReward, LocalModelReward, Reward, RewardUnavailableError,
                      TableDistanceReward)

__all__ = ["ResidualDirichletPolicy", "RLConfig", "RLError", "RLCancelled", "rdpo", "rloo_advantages",
           "Reward", "DemoClassifierReward", "LocalModelReward", "TableDistanceReward",
           "RewardUnavailableError"]
