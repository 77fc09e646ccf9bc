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

# %% [markdown]
# # CIFAR-100: are local solutions the same function?
#
# The paper trains many networks of one architecture on each of 50 two-class CIFAR-100 tasks
# (task *r* = classes 2*r* and 2*r*+1), each run from its own random seed, and asks whether the
# trained weights still tell which task a network solved (§4). Raw weights cannot: a network is
# only defined up to permutations of its hidden neurons, and every run lands on an arbitrary one.
# The **chain alignment rule** (§3.2) removes the permutations: the chain Gram
# $G_l = W_1 \cdots W_l W_l^\top \cdots W_1^\top$ is the same for every permuted copy of a network.
# **Function feature learning** (§3.3) then projects $\mathrm{vec}(G_l)$ with a learned linear map
# $\Theta_l$ and compares networks by the cosine of their projections.
#
# Two protocols measure it, each for the aligned chain $G_l$ and for the unaligned baseline that
# uses the raw layer $W_l$:
#
# * **local-solution classification** — $\Theta_l$ is learned on 60 % of the runs of every task;
#   the other 40 % are assigned to a task (top-1);
# * **retrieval on unseen tasks** — $\Theta_l$ is learned on 30 of the 50 tasks; each run of the
#   other 20 tasks is a query (20 per task) or a gallery item (80 per task); CMC rank-1 and mAP.
#
# The paper's indices are chains 1–3 (its memory limit); the further ones this library computes
# (CNN chain 4, and the classifier's chain for every architecture) are ours and shown apart. The
# parameters below choose the architecture, the data and the profile (the sizes); with
# `dataset = "cifar10"` every network is trained on real CIFAR-10 images in place of CIFAR-100
# (two-class tasks from the 45 pairs of its classes, round robin, so the first five are disjoint as
# the paper's are), with `dataset = "synthetic"` on a synthetic stand-in; the title, the tables and
# the captions say which, and the paper's numbers are drawn only beside CIFAR-100 itself. The run
# that produced this page is stated in the table after them.

# %% tags=["parameters"]
arch = "mlp"  # "mlp" (MLP-4) or "cnn" (PlainNet-5)
profile = "smoke"  # sizes: "smoke" (minutes on a CPU), "laptop" (the book's) or "paper" (the paper's settings)
dataset = "cifar100"  # "cifar100" (the paper's data), "cifar10" (real images in its place) or "synthetic"
data_root = None  # where the dataset lives or is downloaded to (None: $FFL_DATA_ROOT, else ./data)
download = True  # download the dataset (md5-checked) if it is missing
seed = 0  # seeds every zoo network and the learning of Θ
device = "cpu"  # "cpu" or "cuda"

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import ffl.checks
import ffl.data
import ffl.experiment
import ffl.gap
import ffl.plots
import ffl.provenance
import ffl.report

# Checked before any work: a wrong choice stops here with the valid ones.
seed, device, download, data_root = ffl.checks.check_parameters(  # checked and normalized
    seed=seed, device=device, download=download, data_root=data_root).values()
section = ffl.experiment.check_choices(arch=arch, dataset=dataset, profile=profile, section="cifar100",
                                      seed=seed, device=device, download=download, data_root=data_root)
if dataset == "cifar100":  # the data too: missing and not downloadable, this cell says what to do
    ffl.data.cifar100.ensure_cifar100(ffl.data.resolve_root(data_root), download=download)
if dataset == "cifar10":
    ffl.data.cifar10.cifar10_source(ffl.data.resolve_root(data_root), download=download)
ffl.report.publish({"data_label": ffl.report.data_label(dataset, "cifar100")})  # e.g. "CIFAR-10 (in place of CIFAR-100)"
display(Markdown(ffl.provenance.markdown_table(ffl.provenance.run_info(
    device=device, arch=arch, profile=profile, dataset=dataset, seed=seed))))

# %% [markdown]
# ## The zoo
#
# Every network of every task is trained (or loaded from the cache) with the profile's
# hyper-parameters; the table states the zoo, its training, its test accuracy and the sizes of both
# protocols behind every percentage below.

# %%
exp = ffl.experiment.run_experiment(  # the section checked above, passed down
    section, arch=arch, dataset=dataset, data_root=data_root, download=download, seed=seed, device=device,
)
zoo_numbers = ffl.report.zoo_numbers(exp, data_root=data_root, stands_for="cifar100")  # sizes, accuracy, data
ffl.report.publish(zoo_numbers)
display(Markdown(ffl.report.run_table(exp, data=zoo_numbers["data_note"])))

# %% [markdown]
# The zoo holds {glue:text}`n_networks` networks trained on {glue:text}`data_label`:
# {glue:text}`n_tasks` tasks × {glue:text}`n_runs` runs; on average they reach
# {glue:text}`test_acc:.1f` % test accuracy on their own task. Data: {glue:md}`data_note`.
#
# ## Aligned chains against raw layers
#
# For each index $l$ the tables give the measures for the raw layer $W_l$ ("layer") and the chain
# Gram $G_l$ ("chain"); *dim* is the length of the vector $\Theta_l$ acts on. The first table
# holds the paper's indices, 1–3; the second the indices only this library computes.

# %%
in_paper, further = ffl.report.split_at(ffl.report.index_table(exp.results), ffl.report.PAPER_INDICES)
display(Markdown("**Chains 1–3 (the paper's indices)**"), in_paper)
if len(further):
    display(Markdown("**Further indices (ours, not in the paper)**"), further)

# %%
# The paper's CIFAR-100 numbers are drawn only beside a run on CIFAR-100 itself, not a stand-in.
paper, paper_note = ffl.report.paper_drawn("cifar100", arch, dataset)
fig = ffl.plots.protocol_figure(exp.results, paper=paper)
ffl.report.publish({"protocol_figure": fig, "paper_note": paper_note})
plt.close(fig)

# %% [markdown]
# ```{glue:figure} protocol_figure
#
# Local-solution classification (top-1 of {glue:text}`n_cls_test` held-out networks, left) and
# retrieval on unseen tasks (CMC rank-1 of {glue:text}`n_queries` queries against
# {glue:text}`n_gallery` gallery networks, right) per index, for the raw layer weights and the
# aligned chain Grams, on {glue:text}`data_label` — this run's version of the paper's Figure 3;
# indices above 3 are ours. {glue:md}`paper_note`
# ```

# %%
# At the paper's indices 1–3, each with the best of them, and our scale against the paper's.
ffl.report.publish(ffl.report.result_numbers(exp, "cifar100", data_root=data_root,
                                             best_over=ffl.report.PAPER_INDICES))

# %%
# Where the chains' errors land when the zoo's tasks share classes (CIFAR-10's pairs do; the paper's do not)
sharing = ffl.gap.shared_class_tasks(dataset, list(exp.zoo.spec.tasks))
overlap = ffl.gap.overlap_errors(exp, indices=ffl.report.PAPER_INDICES) if any(sharing.values()) else None
if overlap is not None and overlap["errors"].any():  # without errors the shares are undefined; the note says so
    display(Markdown("**Chain classification errors and the tasks they land on**"), overlap.round(3))
ffl.report.publish({"overlap_note": ffl.report.Md(ffl.report.overlap_note(
    overlap, sharing, ffl.report.data_label(dataset, "cifar100")))})

# %% [markdown]
# ## Reading the result
#
# At indices 1 / 2 / 3 the aligned chains classify {glue:text}`chain_top1_1:.1f` /
# {glue:text}`chain_top1_2:.1f` / {glue:text}`chain_top1_3:.1f` % of the held-out networks into
# their task (rank-1 on unseen tasks: {glue:text}`chain_rank1_1:.1f` /
# {glue:text}`chain_rank1_2:.1f` / {glue:text}`chain_rank1_3:.1f` %); the raw layers
# {glue:text}`layer_top1_1:.1f` / {glue:text}`layer_top1_2:.1f` / {glue:text}`layer_top1_3:.1f` %.
#
# {glue:md}`scale_note`
#
# {glue:md}`overlap_note`
#
# On {glue:text}`data_label`, over the paper's indices 1–3: on tasks it never saw while learning
# $\Theta$, the best aligned chain (chain {glue:text}`best_chain_rank1_index`) retrieves a run of
# the same task first for {glue:text}`best_chain_rank1:.1f` % of {glue:text}`n_queries` queries,
# against {glue:text}`best_layer_rank1:.1f` % for the best raw layer (layer
# {glue:text}`best_layer_rank1_index`); in local-solution classification of
# {glue:text}`n_cls_test` held-out networks the best chain reaches
# {glue:text}`best_chain_top1:.1f` % top-1 and the best layer {glue:text}`best_layer_top1:.1f` %.
# The chain features are identical for every permutation of the hidden neurons, so what separates
# tasks here is the function each network computes, not the order in which a run happened to
# arrange its neurons.
