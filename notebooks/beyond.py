# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %%

# %% [markdown]
# # Beyond the paper: FFL against weight matching and CKA
#
# Everything on this page is ours; the paper compares its chains with the raw layers only. Two
# later ways of telling networks apart stand beside them here, on the zoos of the real-data
# chapters (the same zoos, read from the same cache):
#
# * **weight matching** (Git Re-Basin, Ainsworth et al. 2023): the hidden neurons of network *b*
#   are permuted to bring its weights closest to *a*'s (coordinate descent of linear assignments),
#   and then layer $l$'s weights are compared by their cosine — it undoes the permutation symmetry
#   that the chains of §3.2 are blind to by construction;
# * **linear CKA** (Kornblith et al. 2019): the activations of hidden layer $l$ on a fixed probe
#   batch are compared (index $L$, the last: the outputs) — it looks at what the networks compute,
#   not at their weights, and needs data.
#
# FFL's chain Grams $G_l$ (§3.2) are compared by their cosine, the raw layers $W_l$ by theirs. Each
# method scores the **same splits and queries** as the paper's protocols, two ways:
#
# * **unsupervised** (no training): a held-out network takes the task of its most similar
#   Θ-training network (top-1); a query ranks the gallery by similarity (CMC rank-1);
# * **with a learned Θ** (§3.3), as the paper does: only where a method gives each network a vector
#   for Θ to read — the chains and the raw layers. Weight matching and CKA score pairs of networks
#   and give no vector, so they have no learned version.
#
# Beside each number: what it costs per pair of networks on this CPU, in the same run.

# %% tags=["parameters"]
profile = "smoke"  # sizes: "smoke" (minutes on a CPU) or "laptop"; the zoos are those of the profile's chapters
data_root = None  # folder holding the data (None: $FFL_DATA_ROOT, else ./data)
seed = 0  # seeds the zoos, the protocol splits, Θ, the probe batch and weight matching's sweep order

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

import ffl.baselines
import ffl.checks
import ffl.experiment
import ffl.plots
import ffl.profile_settings
import ffl.provenance

# Checked before any work: a wrong choice stops here with the valid ones.
seed, data_root = ffl.checks.check_parameters(seed=seed, data_root=data_root).values()  # checked and normalized
beyond = ffl.profile_settings.load(profile).settings.get("beyond")
if not beyond:
    raise ValueError(f"profile {profile!r} has no beyond: section")
config = ffl.baselines.BaselineConfig.from_section(beyond)
zoos = beyond["zoos"]
sections = [ffl.experiment.check_choices(arch=z["arch"], dataset=z["dataset"], profile=profile, section=z["section"],
                                         seed=seed, data_root=data_root) for z in zoos]
display(Markdown(ffl.provenance.markdown_table(ffl.provenance.run_info(profile=profile, seed=seed))))

# %% [markdown]
# ## The zoos and the runs
#
# Each zoo is trained (or loaded from the cache its chapter filled) with the profile's settings;
# the splits are the chapter's own (the profile's `split` and the seed).

# %%
ARCH_NAMES = {"mlp": "MLP-4", "cnn": "PlainNet-5", "gru": "GRU-2"}
runs, rows = {}, []
for z, section in zip(zoos, sections):
    name = f"{ARCH_NAMES[z['arch']]}, {z['dataset']}"
    runs[name] = run = ffl.baselines.run_comparison(
        section, arch=z["arch"], dataset=z["dataset"], config=config, data_root=data_root,
        seed=seed, progress=False)
    r, n_tasks = run.results, int(run.zoo.tasks.unique().numel())
    cls, ret = (r.query("method == 'chain' and protocol == @p").iloc[0] for p in ("classification", "retrieval"))
    wm = r.query("method == 'weight_matching' and protocol == 'classification'")
    rows.append({"zoo": name, "networks": f"{n_tasks} tasks × {len(run.zoo) // n_tasks} runs",
                 "test accuracy (%)": round(100 * float(run.zoo.accuracy["test"].mean()), 1),
                 "classified / Θ-training": f"{cls['scored']} / {cls['reference']}",
                 "weight matching compares with": f"{wm['reference'].iloc[0]} each" if len(wm) else "not applicable",
                 "queries / gallery": f"{ret['scored']} / {ret['reference']}",
                 "zoo (s)": run.seconds["zoo"], "methods (s)": run.seconds["methods"]})
results = pd.concat([run.results.assign(zoo=name) for name, run in runs.items()], ignore_index=True)
glue("probe_size", config.probe_size, display=False)
glue("max_sweeps", config.max_sweeps, display=False)
glue("hsic", "unbiased" if config.unbiased else "biased", display=False)
pd.DataFrame(rows).set_index("zoo")

# %% [markdown]
# CKA's probe batch: {glue:text}`probe_size` test inputs per zoo, equally many drawn from each of
# its tasks' test sets (the same inputs for every network of the zoo; NameData's names fed by
# length, so no padding reaches a GRU), with the {glue:text}`hsic` HSIC estimator. Weight matching
# aligns the Θ-training (or gallery) network to the one being classified (or the query), up to
# {glue:text}`max_sweeps` sweeps; `ffl.weight_matching` has no permutation rule for a GRU's gates,
# so GRU-2 has no weight-matching number. A "cached" stage was computed by an earlier run with the
# same zoo weights, settings and library code; its costs are that run's.

# %%
LABELS = {("chain", "unsupervised"): "FFL chain", ("chain", "learned"): "FFL chain + Θ",
          ("layer", "unsupervised"): "raw layer", ("layer", "learned"): "raw layer + Θ",
          ("weight_matching", "unsupervised"): "weight matching", ("cka", "unsupervised"): "CKA"}
ORDER = list(LABELS.values())
results["label"] = [LABELS[m] for m in zip(results["method"], results["mode"])]
shown = results[((results.protocol == "classification") & (results.metric == "top1"))
                | ((results.protocol == "retrieval") & (results.metric == "rank1"))]
table = shown.pivot_table(index=["zoo", "index"], columns=["protocol", "label"], values="value", sort=False)
table = (100 * table).round(1)
cost = shown[shown["mode"] == "unsupervised"].groupby(["zoo", "index", "label"], sort=False).apply(
    lambda g: (g["us_per_pair"] * g["pairs"]).sum() / g["pairs"].sum()).unstack("label")
cost.columns = pd.MultiIndex.from_product([["µs per pair"], cost.columns])
table = pd.concat([table, cost.round(1)], axis=1)
table = table.reindex(columns=[(p, m) for p in ("classification", "retrieval", "µs per pair") for m in ORDER
                               if (p, m) in table.columns])
table.columns.names = [None, None]
table.astype(object).where(table.notna(), "n/a")

# %% [markdown]
# Top-1 of local-solution classification and CMC rank-1 of retrieval on unseen tasks, in percent,
# per zoo and index $l$ (layer $W_l$, chain $G_l$, hidden layer $l$'s activations; the last index
# is the output layer); *n/a*: the method does not apply. Cost: the method's wall time in this run
# over the pairs it scored — FFL and raw layers: the index's N × N kernel (N(N+1)/2 pairs, read
# from disk included), weight matching: its matchings (with the cosines of the aligned layers),
# CKA: the probe forward passes of every network plus the index's N × N product. A learned Θ adds
# its fitting to the kernel's cost.

# %%
order = list(runs)
fig, axes = plt.subplots(len(order), 2, figsize=(12, 3.9 * len(order)), squeeze=False)
for row, name in zip(axes, order):
    part = results[results.zoo == name]
    ffl.plots.method_bars(part[part.protocol == "classification"], "top1", order=ORDER,
                          title=f"{name}: local-solution classification", ax=row[0])
    ffl.plots.method_bars(part[part.protocol == "retrieval"], "rank1", order=ORDER,
                          title=f"{name}: retrieval on unseen tasks", ax=row[1])
fig.tight_layout()
glue("methods_figure", fig, display=False)
plt.close(fig)

# %% [markdown]
# ```{glue:figure} methods_figure
# :name: fig-beyond-methods
#
# Top-1 of local-solution classification (left) and rank-1 of retrieval on unseen tasks (right)
# per index, for FFL's chains and the raw layers (each without and with a learned Θ), weight
# matching and linear CKA (no training). Ours; the paper reports none of these comparisons. How many
# networks and queries stand behind each bar is in the table of the runs above.
# ```

# %%
unsup = shown[shown["mode"] == "unsupervised"].set_index(["zoo", "protocol", "index", "method"])["value"]
losses, cells = [], 0
for (name, protocol, index), group in unsup.groupby(level=[0, 1, 2], sort=False):
    values = group.droplevel([0, 1, 2])
    if "chain" not in values.index:  # an index the chains are not computed at (the profile's max_index)
        continue
    cells += 1
    better = values[values > values["chain"]]
    if len(better):
        beaten = ", ".join(f"{LABELS[(m, 'unsupervised')]} {100 * v:.1f} %" for m, v in better.items())
        losses.append(f"* {name}, {protocol}, index {index}: FFL chain {100 * values['chain']:.1f} %, {beaten}")
glue("n_cells", cells, display=False)
glue("n_lost", len(losses), display=False)
glue("losses", Markdown("\n".join(losses) if losses else "* none"), display=False)
mean_cost = results[results["mode"] == "unsupervised"].groupby("method")["us_per_pair"].median()
for method in ("chain", "layer", "weight_matching", "cka"):  # a method no zoo here admits has no cost to state
    cost = mean_cost.get(method)
    glue(f"cost_{method}", Markdown(f"{cost:.1f} µs" if cost is not None and cost == cost else "not applicable"),
         display=False)
learned = shown.set_index(["zoo", "protocol", "index", "method", "mode"])["value"].unstack("mode").dropna()
gain = 100 * (learned["learned"] - learned["unsupervised"])
glue("theta_gain_chain", float(gain.xs("chain", level="method").mean()), display=False)
glue("theta_gain_layer", float(gain.xs("layer", level="method").mean()), display=False)

# %% [markdown]
# ## Where FFL loses
#
# Without training, in {glue:text}`n_lost` of the {glue:text}`n_cells` (zoo, protocol, index) cells
# some other method scores above FFL's chain cosine:
#
# {glue:md}`losses`
#
# A learned Θ changes the chains' numbers by {glue:text}`theta_gain_chain:+.1f` percentage points
# on average over the cells, the raw layers' by {glue:text}`theta_gain_layer:+.1f`. The median cost
# per pair: FFL chain {glue:md}`cost_chain`, raw layer {glue:md}`cost_layer`, weight matching
# {glue:md}`cost_weight_matching`, CKA {glue:md}`cost_cka`. Weight matching solves one assignment problem per hidden layer
# and sweep for every pair; FFL forms each network's chain once and a pair costs one inner product;
# CKA needs data and a forward pass per network, after which a pair also costs one inner product.
# With few networks behind a percentage (the runs table), one network or query moves it in large
# steps.
