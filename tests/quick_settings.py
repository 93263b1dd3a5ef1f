"""What many tests share, declared once: a quick node recipe, small planted tasks, and an environment on one."""

from tree_search.data.planted import PlantedConfig
from tree_search.envs import TreeEnvConfig
from tree_search.reward import NodeRecipe

QUICK = NodeRecipe(train_tokens=None, valid_tokens=None, steps=16, batch_size=128, lr=0.05, measurements=2)
PLANTED = PlantedConfig(num_classes=64, dim=16, signal=3.0, num_train=8000, num_valid=2000, num_test=2000)
ENV = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, split_min_group=8)
NODE_PLANTED = PlantedConfig(
    num_classes=64, dim=16, signal=3.0, num_train=6000, num_valid=1500, num_test=1500
)  # reward
SMALL_PLANTED = PlantedConfig(num_classes=24, dim=8, fanout=3, signal=3.0, num_train=3000, num_valid=600, num_test=600)
