"""The studies, in priority order: the papers' claims as recipes, variants, seeds and verdicts.

Schedules are short where a claim is about differences between arms (the same short schedule
for every arm), so that every GPU run finishes inside one lease command (at most 9 minutes with
its start-up and evaluations: a lease returns no checkpoint); the stated minutes per run are on
one H100 and come from the measurements in docs/RESULTS.md where there are any, carried to
another GPU by its measured speed (`devices.py`). Runs of under ~80 epochs of CIFAR-10 train
without torch.compile: on the H100 compiling took about 65 s and saved 1/20.1k - 1/29.9k s per
image (GPU.md's compute bounds), which pays only after about 4M images.
CIFAR-10 is the shared JPEG copy under the data root: ``<data>/cifar10/{train,test}`` and
``<data>/cifar10n/CIFAR-10_human.pt`` (``tar xzf cifar10-jpg.tar.gz`` in ../shared/data).
"""

from __future__ import annotations

from ssl_ema.reproduce import laptop
from ssl_ema.reproduce.analyses import best_within, ema_gain, final_rule
from ssl_ema.reproduce.study import Study, StudyVariant, kappa_arms
from ssl_ema.reproduce.tool_analyses import quadratic_rule, throughput

V = StudyVariant
CIFAR10 = ("data.dataset=imagefolder", "data.root={data}/cifar10", "data.corrupt=trust")
H100_BYOL = ("BYOL ResNet-18 on one H100: 2.7 s per epoch at batch 512 after compilation, "
             "581 s for 200 epochs with 11 kNN evaluations (docs/RESULTS.md)")


BYOL_PARITY = Study(
    name="byol-parity", title="BYOL like-for-like with lightly's CIFAR-10 benchmark",
    claim="lightly's benchmark configuration reaches its published student kNN within 1.5 points",
    paper="lightly benchmark table (27.03.2023): BYOL ResNet-18, 200 epochs, batch 512: kNN 0.868",
    schedule="200 epochs, batch 512, CIFAR-10 JPEG copy",
    recipe="recipes/byol_r18_lightly.yaml", variants=(V("lightly"),),
    common=(*CIFAR10, "data.num_workers=16"), minutes_per_run=10.5,
    estimate_source=H100_BYOL + "; this recipe evaluates 21 times (+10 × ~3 s)",
    plot_keys=("knn_student", "knn_teacher"),
    analysis=best_within("lightly", "knn_student", 0.868, 0.015))

BYOL_SCALING = Study(
    name="byol-scaling", title="BYOL at batch 256κ with and without the EMA Scaling Rule",
    claim="with the rule the teacher's kNN stays within 1 point of κ = 1; without it, it falls "
          "by more than 1 point at κ ≥ 4",
    paper="Busbridge et al. 2023, Sec. 3.4 (BYOL ResNet-18, CIFAR-10): the rule keeps kNN "
          "accuracy across batch sizes; without it accuracy drops",
    schedule="30 epochs, reference batch 256 (lr 0.12, teacher 0.99 → 1), CIFAR-10 JPEG copy",
    recipe="recipes/byol_r18.yaml",
    # κ = 1 and 8 with and without the rule first (a verdict from the first lease), then 4,
    # the progressive arms, then 2 (`kappa_arms`' order, seed-major in the runner).
    variants=tuple(sorted((*kappa_arms({1: 256, 2: 512, 4: 1024, 8: 2048}),
                           *(V(f"progressive_{rule}", (
                               "train.batch_size=256", f"scaling.rule={rule}",
                               "train.batch_schedule=[[15, 2048]]"))
                             for rule in ("ema", "optimizer"))),
                          key=lambda v: v.name.startswith("k2_"))),
    common=(*CIFAR10, "data.num_workers=16", "scaling.reference_batch=256", "optim.lr=0.12",
            "train.epochs=30", "eval.every_epochs=10", "train.compile=false"),
    minutes_per_run=2.5, estimate_source="an estimate from the H100's figures (docs/RESULTS.md "
    "'BYOL training images/s on one H100', GPU.md): 1.5M images eager at ~0.9 × its 20.1k "
    "images/s bound ≈ 85-100 s, 4 kNN evaluations ≈ 12 s, start-up and decoding ≈ 20 s",
    plot_keys=("knn_teacher",),
    analysis=final_rule("k1", [(2, "k2_ema", "k2_optimizer"), (4, "k4_ema", "k4_optimizer"),
                               (8, "k8_ema", "k8_optimizer"),
                               (8, "progressive_ema", "progressive_optimizer")], "knn_teacher"))

EMA_BENEFITS = Study(
    name="ema-benefits", title="EMA models against the last iterate, clean and noisy labels",
    claim="the best EMA (early stopping on validation) beats the best last iterate, by more "
          "under CIFAR-10N worse labels than with clean labels",
    paper="Morales-Brotons et al. 2024: CIFAR-10 95.25 → 95.62; CIFAR-10N worse 78.09 → 86.71 "
          "(last iterate → EMA, 200 epochs)",
    schedule="30 epochs of supervised_ema_r18 (batch 128, five EMAs, BN recomputed), 2 seeds",
    recipe="recipes/supervised_ema_r18.yaml",
    variants=(V("clean", ("labels.noisy=clean",)),
              V("worse", ("labels.noisy=worse",
                          "labels.noisy_file={data}/cifar10n/CIFAR-10_human.pt"))),
    seeds=(0, 1), common=(*CIFAR10, "data.num_workers=16", "data.pipeline=device",
                          "train.epochs=30", "eval.every_epochs=3"),
    minutes_per_run=4.0, estimate_source="a guess: views on the GPU (data.pipeline=device, "
    "unmeasured there); 1.5M training images at batch 128, ~15k/s (a supervised step is ~3/8 of "
    "BYOL's per image, a small batch uses the GPU less) ≈ 2 min, plus 10 evaluations of 6 "
    "models with BatchNorm recomputation ≈ 1.5 min",
    plot_keys=("acc_student_test", "acc_teacher_test"),
    analysis=ema_gain({"clean": "clean", "worse": "CIFAR-10N worse"}, "best_ema_test",
                      "best_student_test"))


def _kappa4_study(name: str, title: str, what: str, paper: str, schedule: str, recipe: str,
                  batch: int, epochs: int, key: str, minutes: float, source: str,
                  plot_keys: tuple[str, ...], anchor: str, extra: tuple[str, ...] = ()) -> Study:
    """κ = 1 against κ = 4 with and without the rule, judged on the final ``key``."""
    return Study(
        name=name, title=title,
        claim=f"with the rule the teacher's {what} at κ = 4 is within 1 point of κ = 1; "
              "without it, it falls by more than 1 point",
        paper=paper, schedule=schedule, recipe=recipe,
        variants=kappa_arms({1: batch, 4: 4 * batch}),
        common=(*CIFAR10, "data.num_workers=16", f"train.epochs={epochs}",
                "eval.every_epochs=10", *extra),
        minutes_per_run=minutes, estimate_source=source, plot_keys=plot_keys,
        analysis=final_rule("k1", [(4, "k4_ema", "k4_optimizer")], key, anchor=anchor))


DINO_SCALING = _kappa4_study(
    "dino-scaling", "DINO at batch 128 and 512 with and without the rule", "kNN",
    "lightly's DINO benchmark with a fixed momentum: kNN 0.840 at batch 128 → 0.813 at 512",
    "30 epochs of dino_r18 (views on the GPU), reference batch 128, CIFAR-10 JPEG copy",
    "recipes/dino_r18.yaml", 128, 30, "knn_teacher", 4.0, "a guess: DINO has never trained on "
    "a GPU; 1.5M images at about half BYOL's H100 rate (batch 128) ≈ 3 min, 4 evaluations, "
    "start-up", ("knn_teacher",), "lightly (fixed momentum, 200 epochs): 0.840 → 0.813",
    extra=("data.pipeline=device",))

PSEUDO_LABEL = _kappa4_study(
    "pseudo-label", "Pseudo-labelling with 4,000 labels at κ = 1 and 4", "test accuracy",
    "Busbridge et al. 2023, Sec. 3.3; FixMatch 4.21% error on 4,000 labels (2^20 steps, "
    "TorchSSL)", "20 passes over the unlabelled images (2,040 steps of 64 labelled + 448 "
    "unlabelled at κ = 1), CIFAR-10 JPEG copy", "recipes/pseudo_label_r18.yaml", 64, 20,
    "acc_teacher_test", 4.0, "a guess: views on the GPU (data.pipeline=device, unmeasured "
    "there); 2,040 steps of 512 images forward and backward + 448 teacher forwards ≈ 1.35M "
    "image-equivalents at ~25k/s ≈ 1 min, 2M views, 2 evaluations; κ = 4 alike",
    ("acc_teacher_test", "acc_student_test"), "FixMatch at 2^20 steps: 95.79% (4.21% error)",
    extra=("data.pipeline=device",))

NOISY_QUADRATIC = Study(
    name="noisy-quadratic", title="The EMA Scaling Rule on a noisy quadratic (synthetic, CPU)",
    claim="with the rule (lr × κ, ρ^κ) the EMA's loss curve against samples seen matches κ = 1 "
          "within 3% at every κ ≤ 16; without it (ρ kept) it is off by ≥ 15% at κ = 8 and 16, "
          "also when the EMA feeds back into training (coupling c = 2)",
    paper="Busbridge et al. 2023, Sec. 3 (an SDE argument; checked on a noisy problem): with the "
          "rule the iterate and its EMA follow κ = 1's trajectory in samples seen (figures; no "
          "number quoted here)",
    schedule="SGD + EMA on ½ xᵀ diag(1, 0.5) x with per-sample gradient noise σ = 5, lr 0.002 "
             "and ρ 0.995 per sample, 3,200 samples, 2,000 float64 replicas, κ ∈ {1, 2, 4, 8, 16}",
    recipe="", tool="tools/noisy_quadratic.py",
    variants=(V("c0", ("--coupling", "0", "--no-plot")),
              V("c2", ("--coupling", "2", "--no-plot"))),
    device="cpu", minutes_per_run=0.5, estimate_source="~10 s each on 2 idle cores "
    "(docs/RESULTS.md)", plot_keys=("ema/1", "ema/16", "optimizer/16"),
    analysis=quadratic_rule({"c0": "c = 0", "c2": "c = 2 (EMA feeds back)"}))

BENCH_EMA = "tools/bench_ema.py"
THROUGHPUT = Study(
    name="throughput", title="Throughput: one EMA update and BYOL training images/s (GPU)",
    claim="our EMA update is faster than lightly's, timm's and torch's at K = 1 and 5 momenta "
          "for every model, and BYOL trains at ≥ 4× a lightly-style loader and ≥ 0.85× the "
          "compute bound",
    paper="README: 21k images/s on one H100, 4.5× a lightly-style loader, 0.90× the compute "
          "bound (BYOL ResNet-18, batch 512, commit 6da4c94)",
    schedule="bench_ema: ResNet-18, ResNet-50, ViT-B/16, median of 20 updates; bench_train: "
             "recipes/byol_r18.yaml, 40 warm-up + 120 timed steps, 16 loader workers",
    recipe="", tool="tools/bench_train.py",
    variants=(V("ema", ("--device", "cuda", "--models", "resnet18", "resnet50",
                        "vit_base_patch16_224"), tool=BENCH_EMA, minutes=1.5),
              V("byol_r18", ("recipes/byol_r18.yaml", *CIFAR10, "data.num_workers=16",
                             "--warmup", "40", "--steps", "120", "--workers", "16"))),
    minutes_per_run=4.0, estimate_source="unmeasured as a whole: bench_train's parts on the "
    "H100 took under 3 minutes (docs/RESULTS.md, 'BYOL training images/s on one H100')",
    timed=True, analysis=throughput(ema="ema", train="byol_r18"))

THROUGHPUT_CPU = Study(
    name="throughput-cpu", title="One EMA update on the CPU: ours against the libraries",
    claim="our EMA update is faster than lightly's, timm's and torch's at K = 1 and 5 momenta",
    paper="docs/RESULTS.md 'One EMA update: ours against the libraries (CPU)': 1.1-1.8× faster "
          "than the peers (2-core CPU, one thread)",
    schedule="bench_ema on ResNet-18, one thread, median of 7 updates after 2",
    recipe="", tool=BENCH_EMA,
    variants=(V("ema", ("--device", "cpu", "--models", "resnet18", "--repeats", "7",
                        "--warmup", "2")),),
    device="cpu", minutes_per_run=1.0, estimate_source="a guess: 7 implementations × 2 K × 9 "
    "updates of ResNet-18 plus one torch.compile", env={"OMP_NUM_THREADS": "1"},
    timed=True, analysis=throughput(ema="ema"))

RECIPES = Study(
    name="recipes", title="Every shipped CIFAR-10 recipe at its full schedule",
    claim="each recipe's final number is measured (docs/CONFIGURATION.md's recipe table)",
    paper="per recipe: see docs/CONFIGURATION.md",
    schedule="each recipe's own full schedule, CIFAR-10 JPEG copy",
    recipe="recipes/byol_r18.yaml",
    variants=(V("byol_r18", minutes=10.0), V("dino_r18", recipe="recipes/dino_r18.yaml",
                                             minutes=35.0),
              V("dino_vit_tiny", recipe="recipes/dino_vit_tiny.yaml", minutes=45.0),
              V("supervised_ema_r18", recipe="recipes/supervised_ema_r18.yaml", minutes=40.0),
              V("pseudo_label_r18", recipe="recipes/pseudo_label_r18.yaml", minutes=50.0)),
    common=(*CIFAR10, "data.num_workers=16"), minutes_per_run=10.0,
    estimate_source="BYOL measured (581 s); the others guessed from their CPU step times")

# Priority order: a lease takes the first runs that fit what is left of it, so the scaling
# verdicts come first; byol-parity (about 10 H100 minutes: one command only if this GPU is fast
# enough, else `--slice` over two commands of one lease) and the full-schedule recipes (longer
# than any command: skipped unless sliced) follow; then the CPU studies, the papers' data first.
STUDIES: tuple[Study, ...] = (BYOL_SCALING, BYOL_PARITY, EMA_BENEFITS, DINO_SCALING,
                              PSEUDO_LABEL, *laptop.STUDIES, NOISY_QUADRATIC, THROUGHPUT,
                              THROUGHPUT_CPU, RECIPES)


def by_name(names: list[str]) -> list[Study]:
    """The named studies in priority order; KeyError names an unknown one."""
    known = {s.name: s for s in STUDIES}
    for n in names:
        if n not in known:
            raise KeyError(n)
    return [s for s in STUDIES if not names or s.name in names]
