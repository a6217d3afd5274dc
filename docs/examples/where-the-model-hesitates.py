# %% [markdown]
# # Where does the model hesitate?
#
# A notebook in Jupytext's percent format (open it in Jupyter with jupytext, or in VS Code,
# or run it as a script: `python docs/examples/where-the-model-hesitates.py`). It traces a few
# hundred sentence openings of the test corpus with SmolLM2, reads the steps as a pandas
# DataFrame and draws two things with matplotlib:
#
# - how uncertain the model is (entropy of the raw and of the sampling-processed distribution)
#   at each generated position, median and interquartile range over the prompts;
# - how often the sampler picks a token that is not the model's top choice, against how
#   uncertain the model was at that step.
#
# Settings come from the environment so the test suite can run it on the tiny test model:
# LOGITPROBE_EXAMPLE_MODEL (default SmolLM2-135M-Instruct Q4_1 in the models cache),
# LOGITPROBE_EXAMPLE_PROMPTS (default 300) and LOGITPROBE_EXAMPLE_PNG (where the figure goes).

# %%
import os
import pathlib
import re

import matplotlib

matplotlib.use("Agg")  # no display needed; in Jupyter, drop this line to see the figure inline
import matplotlib.pyplot as plt
import pandas as pd

import logitprobe as lp

root = pathlib.Path(__file__).resolve().parents[2] if "__file__" in globals() else pathlib.Path.cwd()
model_path = os.environ.get(
    "LOGITPROBE_EXAMPLE_MODEL", "~/.cache/logitprobe/SmolLM2-135M-Instruct.Q4_1.gguf"
)
n_prompts = int(os.environ.get("LOGITPROBE_EXAMPLE_PROMPTS", "300"))
png = pathlib.Path(
    os.environ.get("LOGITPROBE_EXAMPLE_PNG", root / "assets" / "docs" / "where-the-model-hesitates.png")
)

# %% [markdown]
# The prompts: the first eight words of each sentence of Genesis (King James Version).

# %%
text = (root / "models" / "corpus" / "genesis-kjv.txt").read_text(encoding="utf-8")
sentences = [s for s in re.split(r"(?<=[.;:?!])\s+", text) if len(s.split()) >= 8]
prompts = [" ".join(s.split()[:8]) for s in sentences[:n_prompts]]
len(prompts), prompts[:3]

# %% [markdown]
# Trace them: 24 new tokens each, sampled at temperature 0.8 with top-p 0.95 (the defaults)
# and a fixed seed, so the same run comes back next time, and from the command line
# (`logitprobe trace --seed 1 ...`).

# %%
with lp.Model(model_path, threads=2) as m:
    run = m.trace(prompts, max_new_tokens=24, temperature=0.8, seed=1)
steps = run.to_pandas()  # one row per prompt and step
steps[["prompt_index", "step", "token", "raw_entropy", "processed_entropy", "raw_selected_rank"]].head()

# %% [markdown]
# Entropy by position: the median and the interquartile range over the prompts.

# %%
by_step = steps.groupby("step")[["raw_entropy", "processed_entropy"]].quantile([0.25, 0.5, 0.75])
by_step = by_step.unstack()

# %% [markdown]
# The sampler's off-top picks: the share of steps whose sampled token is not the raw
# distribution's rank 1, in ten bins of raw entropy holding equally many steps.

# %%
steps["entropy_bin"] = pd.qcut(steps["raw_entropy"], 10, duplicates="drop")
off_top = steps.groupby("entropy_bin", observed=True).agg(
    entropy=("raw_entropy", "median"),
    off_top=("raw_selected_rank", lambda r: (r > 1).mean()),
    steps=("raw_selected_rank", "size"),
)
off_top

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
for column, colour, label in [
    ("raw_entropy", "tab:blue", "raw (the model's logits)"),
    ("processed_entropy", "tab:orange", "processed (after temperature and top-p)"),
]:
    x = by_step.index
    left.plot(x, by_step[(column, 0.5)], color=colour, label=label)
    left.fill_between(x, by_step[(column, 0.25)], by_step[(column, 0.75)], color=colour, alpha=0.2)
left.set_xlabel("generated position (step)")
left.set_ylabel("entropy (nats)")
left.set_title(f"Uncertainty by position, {len(prompts)} prompts (median, IQR)")
left.legend(loc="lower left", fontsize=9)
left.set_ylim(bottom=0)

right.bar(range(len(off_top)), off_top["off_top"] * 100, color="tab:purple")
right.set_xticks(range(len(off_top)), [f"{e:.2f}" for e in off_top["entropy"]], rotation=45)
right.set_xlabel("raw entropy at the step (median of each tenth of the steps, nats)")
right.set_ylabel("sampled token is not the top one (%)")
right.set_title("Off-top picks grow with the model's uncertainty")
fig.suptitle(f"{pathlib.Path(model_path).name}, 24 tokens each, temperature 0.8, seed 1",
             fontsize=10, color="0.4")
png.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(png, dpi=110)
print(f"wrote {png}")
