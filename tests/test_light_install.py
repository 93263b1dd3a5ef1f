"""The core (tree, builders, export, heads) works with torch and numpy alone; the search stack is an extra."""

import re
import subprocess
import sys
import textwrap
from importlib.metadata import requires

SEARCH_STACK = ("ray", "optuna", "gymnasium", "cmaes", "tensorboard", "matplotlib", "click", "rich", "threadpoolctl")
# Prepended to a child process's script: from then on, importing any search-stack package fails as if uninstalled.
UNINSTALL_SEARCH_STACK = textwrap.dedent(f"""
    import importlib.abc, sys

    class Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {SEARCH_STACK!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Uninstalled())
""")


def test_the_core_runs_with_the_search_stack_uninstalled(tmp_path):
    """In a process where importing any search-stack package fails, load a tree and train a head on it."""
    script = UNINSTALL_SEARCH_STACK + textwrap.dedent(f"""
        import numpy as np, torch
        from tree_search import builders
        from tree_search.export import load_tree, save_tree
        from tree_search.heads import TreeSoftmaxHead

        counts = np.arange(50, 0, -1)
        save_tree({str(tmp_path / "t.tree.json")!r}, builders.huffman(counts, 4), labels=[f"w{{i}}" for i in range(50)],
                  counts=counts)
        record = load_tree({str(tmp_path / "t.tree.json")!r})
        head = TreeSoftmaxHead(record.tree, dim=8)
        h, y = torch.randn(32, 8), torch.randint(0, 50, (32,))
        output, loss = head(h, y)
        loss.backward()
        assert torch.isfinite(loss) and record.labels[3] == "w3"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SEARCH_STACK!r})
        assert not loaded, loaded
        print("core ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr


def test_the_command_line_without_the_extra_says_what_to_install():
    script = UNINSTALL_SEARCH_STACK + textwrap.dedent("""
        from tree_search.cli import main
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "tree_search[search]" in done.stderr and "Traceback" not in done.stderr


def test_the_package_declares_only_torch_and_numpy_as_core_dependencies():
    """The installed package's metadata: requirements without an extra marker are the core."""
    declared = requires("tree_search") or []
    name = lambda requirement: re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]  # noqa: E731
    core = {name(r) for r in declared if "extra ==" not in r}
    search = {name(r) for r in declared if re.search(r"extra == .search.", r)}
    assert core == {"torch", "numpy"}, declared
    assert {"ray", "optuna", "gymnasium", "click", "rich"} <= search, declared
