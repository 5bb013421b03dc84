"""The studies sized for a laptop: the papers' claims on CIFAR-10 and CIFAR-10N (and the rule on
digits) on 2 CPU cores.

Each study trains on a fixed class-balanced subset of the CIFAR-10 JPEG copy
(``data.train_per_class``, the same images for every seed) with timm's ``test_resnet`` at 32 px,
views made in batched ops (``data.pipeline=device``), one torch thread per run: on a 2-core
machine two runs share it best one per core, and a thread that waits for a busy core makes every
step several times slower (docs/RESULTS.md). The network, subset and schedule of each study were
chosen from speed and accuracy measurements made before any of its results (its recipe's
comments give them); the schedule is stated beside every number. Minutes are per run, two runs
at once on 2 idle cores (``reproduce.py run --jobs``' default there).
"""

from __future__ import annotations

from ssl_ema.reproduce.analyses import ema_curve_rule, final_rule, provided
from ssl_ema.reproduce.ema_benefits import ema_benefits
from ssl_ema.reproduce.posthoc_sweep import posthoc_sweep
from ssl_ema.reproduce.study import Study, StudyVariant, kappa_arms

V = StudyVariant
CIFAR10 = ("data.root={data}/cifar10",)
CIFAR10N = "labels.noisy_file={data}/cifar10n/CIFAR-10_human.pt"
ONE_THREAD = {"SSL_EMA_CPU_THREADS": "1"}
TWO_IDLE = ("two at once on 2 idle cores (docs/RESULTS.md, 'The laptop studies, each whole on 2 "
            "idle cores')")


EMA_BENEFITS_CPU = Study(
    name="ema-benefits-cpu",
    title="EMA models against the last iterate on CIFAR-10 and CIFAR-10N worse (CPU)",
    claim="the best EMA beats the best last iterate (each chosen on validation), by more under "
          "CIFAR-10N worse labels than with clean labels; the EMAs churn less between seeds "
          "and are better calibrated (test ECE, 100 bins)",
    paper="Morales-Brotons et al. 2024 (ResNet-18, 200 epochs): CIFAR-10 95.25 → 95.62; "
          "CIFAR-10N worse 77.69 → 86.71 (ResNet-34); churn 3.78% → 2.71%",
    schedule="test_resnet, 32 px, 1,000 CIFAR-10 images a class (800 train + 200 validation), "
             "80 epochs of batch 128 (4,960 steps), SGD Nesterov, cosine lr 0.1; EMAs "
             "0.968-0.998 every step with the warm-up, 2 seeds",
    recipe="recipes/supervised_ema_cifar_cpu.yaml",
    variants=(V("clean", ("labels.noisy=clean",)), V("worse", ("labels.noisy=worse", CIFAR10N))),
    seeds=(0, 1), common=CIFAR10, device="cpu", minutes_per_run=21.5,
    estimate_source="a run took 1,253-1,285 s, " + TWO_IDLE,
    env=ONE_THREAD, plot_keys=("acc_student_test", "acc_teacher_test", "acc_ema_0.998_test"),
    analysis=ema_benefits({"clean": "clean", "worse": "CIFAR-10N worse"}))

def model_ema_scaling(name: str, title: str, schedule: str, recipe: str,
                      batches: dict[int, int], seeds: tuple[int, ...], minutes: float,
                      source: str, common: tuple[str, ...] = ()) -> Study:
    """Busbridge et al.'s first check, on a supervised model EMA (one that does not feed back
    into training): κ = 1 against κ = 4 and 16, with and without the rule, judged on the
    teacher's accuracy curve against samples seen beside the student's."""
    return Study(
        name=name, title=title,
        claim="at κ = 4 and 16 the ruled EMA's accuracy curve against samples seen stays as "
              "close to κ = 1 as the student's does; without the rule the EMA departs further",
        paper="Busbridge et al. 2023 (supervised model EMA): with the rule the EMA's curve "
              "matches κ = 1; without it the EMA lags (a figure; no number quoted here)",
        schedule=schedule, recipe=recipe, variants=kappa_arms(batches), seeds=seeds,
        common=common, device="cpu", minutes_per_run=minutes, estimate_source=source,
        env=ONE_THREAD, plot_keys=("acc_teacher_test", "acc_student_test"),
        analysis=ema_curve_rule("k1", [(4, "k4_ema", "k4_optimizer"),
                                       (16, "k16_ema", "k16_optimizer")],
                                "acc_teacher_test", "acc_student_test"))


SCALING_CIFAR_CPU = model_ema_scaling(
    "scaling-cifar-cpu", "The EMA Scaling Rule on a supervised model EMA, CIFAR-10 (CPU)",
    "test_resnet, 32 px, 2,000 CIFAR-10 images a class, 16 epochs, reference batch 32, EMA "
    "0.998 per reference step, 2 seeds", "recipes/scaling_cifar_cpu.yaml",
    {1: 32, 4: 128, 16: 512}, (0, 1), 6.0, "a run took 315-427 s, " + TWO_IDLE,
    CIFAR10)

SCALING_CPU = model_ema_scaling(
    "scaling-cpu", "The EMA Scaling Rule on a supervised model EMA (digits, CPU)",
    "6 epochs of digits (≈ 8,500 samples), test_resnet at 16 px, reference batch 16, teacher "
    "0.98 per reference step, 3 seeds", "recipes/scaling_digits.yaml", {1: 16, 4: 64, 16: 256},
    (0, 1, 2), 1.5, "κ = 1 took 92 s on 2 shared cores (load 6.5)",
    ("train.checkpoint_every=100",))

BYOL_CIFAR_CPU = Study(
    name="byol-cifar-cpu",
    title="BYOL on CIFAR-10 at batch 64 and 512, with and without the EMA Scaling Rule (CPU)",
    claim="κ = 1's teacher clears the fair floor by 3 points; with the rule the teacher's kNN "
          "at κ = 8 is within 2 points of κ = 1; without it, it falls by more than 2 points",
    paper="Busbridge et al. 2023, Sec. 3.4 (BYOL ResNet-18, CIFAR-10): the rule keeps kNN "
          "accuracy across batch sizes; without it accuracy drops",
    schedule="test_resnet, 32 px, 2,000 CIFAR-10 images a class, 15 epochs, reference batch "
             "64 (SGD lr 0.1, teacher 0.99 → 1), 2 seeds",
    recipe="recipes/byol_cifar_cpu.yaml", variants=kappa_arms({1: 64, 8: 512}),
    seeds=(0, 1), common=CIFAR10, device="cpu", minutes_per_run=16.5,
    estimate_source="a run took 847-999 s, " + TWO_IDLE,
    env=ONE_THREAD, plot_keys=("knn_teacher", "knn_student"),
    analysis=final_rule("k1", [(8, "k8_ema", "k8_optimizer")], "knn_teacher",
                        tolerance=0.02, falls_from=8, floor="knn_random_bn",
                        companion="knn_student"))

PSEUDO_LABEL_CPU = Study(
    name="pseudo-label-cpu",
    title="Pseudo-labelling with 4,000 labels at batch 64 and 256, with and without the EMA "
          "Scaling Rule (CPU)",
    claim="with the teacher's pseudo-labels feeding back (κ = 1's last epoch keeps at least 10% "
          "of them), the ruled teacher's test-accuracy curve against samples seen stays as "
          "close to κ = 1 at κ = 4 as the student's does; without the rule it departs further",
    paper="Busbridge et al. 2023, Sec. 3.3 (pseudo-labelling, where the teacher feeds back): "
          "with the rule the curves match across batch sizes, without it they do not (speech "
          "recognition there; FixMatch 4.21% error on CIFAR-10 with 4,000 labels, 2^20 steps, "
          "TorchSSL, for scale)",
    schedule="test_resnet, 32 px, 400 labelled + 1,792 unlabelled CIFAR-10 images a class, 27 "
             "passes over the unlabelled images (1,080 steps of 64 labelled + 448 unlabelled at "
             "κ = 1), τ 0.8, teacher 0.99 per reference step, SGD Nesterov lr 0.03, 2 seeds",
    recipe="recipes/pseudo_label_cifar_cpu.yaml", variants=kappa_arms({1: 64, 4: 256}),
    seeds=(0, 1), common=CIFAR10, device="cpu", minutes_per_run=16.0,
    estimate_source="sizing runs: a step took 1.0 s on one thread at load 3 (docs/RESULTS.md)",
    env=ONE_THREAD, plot_keys=("acc_teacher_test", "acc_student_test", "mask_rate"),
    analysis=provided(ema_curve_rule("k1", [(4, "k4_ema", "k4_optimizer")],
                                     "acc_teacher_test", "acc_student_test"),
                      "k1", "mask_rate", 0.1, "pseudo-labels fed back"))

POSTHOC_SIGMAS = ("0.01", "0.02", "0.04", "0.07", "0.1", "0.15", "0.2", "0.28")
POSTHOC_CPU = Study(
    name="posthoc-ema-cpu",
    title="Post-hoc EMA: the EMA length chosen after training, against five tracked EMAs "
          "(digits, CPU)",
    claim="the post-hoc EMA chosen on validation (σ_rel swept 0.01-0.28, reconstructed from two "
          "power EMAs' snapshots) reaches the test accuracy of the tracked EMA chosen on "
          "validation (five momenta) within 1 point, or beats it; every model with BatchNorm "
          "recomputed",
    paper="Karras et al. 2024 (EDM2, Sec. 3 and Fig. 5): reconstructed EMAs match directly "
          "tracked ones, and the best EMA length depends on the model and the training length "
          "(image generation, FID; no classification number)",
    schedule="supervised_ema_digits at laptop size: test_resnet, digits at 8 px with 40% "
             "symmetric label noise (where the EMA matters most), 8 epochs of batch 64 (136 "
             "steps), SGD Nesterov; tracked EMAs 0.5-0.97 per step with the warm-up, power EMAs "
             "σ_rel 0.05 and 0.1, a snapshot every 1/64 of the run; one seed",
    recipe="", tool="tools/posthoc_ema.py",
    variants=(V("digits", ("--train", "recipes/supervised_ema_digits.yaml", "--set",
                           "model.backbone=test_resnet", "data.image_size=8", "train.epochs=8",
                           "labels.symmetric_noise=0.4",
                           "eval.every_epochs=0", "train.checkpoint_every=20",
                           "ema.posthoc.sigma_rels=[0.05,0.1]",
                           "--sigma-rel", *POSTHOC_SIGMAS)),),
    device="cpu", minutes_per_run=15.0,
    estimate_source="the study's run took 306 s, training and sweep, on 2 cores shared at "
                    "load 8.7 (docs/RESULTS.md)",
    env=ONE_THREAD, analysis=posthoc_sweep("digits"),
    plot_keys=tuple(f"results/{r}+bn/accuracy" for r in ("teacher", "student", "posthoc_0.02",
                                                          "posthoc_0.1")))

STUDIES: tuple[Study, ...] = (EMA_BENEFITS_CPU, SCALING_CIFAR_CPU, BYOL_CIFAR_CPU,
                              PSEUDO_LABEL_CPU, SCALING_CPU, POSTHOC_CPU)
