"""A run pays for torch._dynamo (~2.5 s to import) only when it compiles (lehi._lazy_dynamo).

Each check starts a clean interpreter: in this one, other tests have long since imported it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

#: LEHI and torch's Adam through every torch.optim method that would import dynamo: the
#: constructor (add_param_group), zero_grad, step, state_dict and load_state_dict.
STEPS = """
    import json, sys
    import torch
    import lehi.runner  # the suite's runs defer torch.optim's dynamo imports
    from lehi.optim import LEHI, backward

    def train(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt = make(model.parameters())
        for _ in range(3):
            opt.zero_grad()
            outputs = model(x)
            loss = torch.nn.functional.cross_entropy(outputs, y)
            if isinstance(opt, LEHI):
                backward(opt, loss, outputs, y)
            else:
                loss.backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())
        return [p.detach().flatten().tolist() for p in model.parameters()]

    makers = {"lehi": lambda p: LEHI(p, lr=1e-2, seed=0), "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}
    before = {name: train(make) for name, make in makers.items()}
    loaded = "torch._dynamo" in sys.modules
    import torch._dynamo  # from here on torch's own wrappers run, as in a compiled run
    after = {name: train(make) for name, make in makers.items()}
    print(json.dumps({"loaded": loaded, "before": before, "after": after}))
"""


def clean_python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_plain_steps_do_not_import_dynamo_and_train_as_torch_would():
    result = json.loads(clean_python(STEPS))
    assert result["loaded"] is False
    # Once dynamo is loaded the same steps go through torch's own disable wrappers and graph
    # breaks: the deferred path computed exactly the same weights.
    assert result["before"] == result["after"]


def test_a_run_without_compile_does_not_import_dynamo(tmp_path):
    code = """
        import runpy, sys
        sys.argv = ["run.py", *sys.argv[1:]]
        runpy.run_path("run.py", run_name="__main__")
        print("torch._dynamo" in sys.modules)
    """
    args = ["logger=files", "trainer.max_steps=3", f"paths.results_dir={tmp_path}"]
    assert clean_python(code, *args, f"hydra.run.dir={tmp_path}/hydra") == "False"


def test_the_library_alone_leaves_torch_optim_as_it_is():
    code = """
        import torch, lehi.optim
        print(torch.optim.Adam.step.__code__.co_name)
    """
    assert clean_python(code) == "_use_grad"
