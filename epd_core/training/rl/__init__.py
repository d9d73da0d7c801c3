"""RDPO: Residual Dirichlet Policy Optimization, RL fine-tuning of an EPD table on a reward
(docs/method.md, "RL fine-tuning").
Pure torch; never imports ComfyUI."""
from epd_core.training.rl.policy import ResidualDirichletPolicy
from epd_core.training.rl.rdpo import RLCancelled, RLConfig, RLError, rdpo, rloo_advantages
from epd_core.training.rl.rewards import (DemoClassifierReward, LocalModelReward, Reward, RewardUnavailableError,
                                          TableDistanceReward)

__all__ = ["ResidualDirichletPolicy", "RLConfig", "RLError", "RLCancelled", "rdpo", "rloo_advantages",
           "Reward", "DemoClassifierReward", "LocalModelReward", "TableDistanceReward",
           "RewardUnavailableError"]
