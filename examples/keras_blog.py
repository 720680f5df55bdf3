"""The seed blog's experiment with its own Keras code: Fashion-MNIST, 5 IID clients, 7 rounds
of FedAvg, 5 local epochs of the blog's ``create_model()`` CNN (compiled with ``SGD()`` and
categorical cross-entropy), and the blog's two plots.

    pip install 'pollinate[keras,data]'
    POLLINATE_DATA=../shared/data python examples/keras_blog.py [--rounds 7] [--output DIR]

``create_model`` is the blog's function as written: pollinate calls it once per worker,
converts the data for it (channels-last images, one-hot labels for its categorical
cross-entropy) and trains it with ``model.fit``. Writes the run folder (history.json,
metrics.csv, plots) and ``global_accuracy.png`` / ``client_accuracy.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras.layers import Conv2D, Dense, Flatten, Input, MaxPooling2D
from keras.models import Sequential
from keras.optimizers import SGD


def create_model():
    """The blog's model: a small CNN for 28x28 grey-scale images and 10 classes."""
    model = Sequential(
        [
            Input(shape=(28, 28, 1)),
            Conv2D(32, (3, 3), activation="relu"),
            MaxPooling2D((2, 2)),
            Conv2D(64, (3, 3), activation="relu"),
            MaxPooling2D((2, 2)),
            Flatten(),
            Dense(128, activation="relu"),
            Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=SGD(), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def plot(history: dict, folder: Path) -> None:
    """The blog's plots: the global model's accuracy per round, and each client's accuracy
    (its trained model on its held-out data) against the global model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history["rounds"]]
    global_acc = [r["centralized"]["accuracy"] for r in history["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, global_acc, marker="o")
    ax.set(xlabel="round", ylabel="accuracy", title="Global model accuracy (test set)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "global_accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    clients = sorted({c for r in history["rounds"] for c in r.get("clients", {})}, key=int)
    for cid in clients:
        points = [
            (r["round"], r["clients"][cid]["train"]["local_accuracy"])
            for r in history["rounds"]
            if "train" in r.get("clients", {}).get(cid, {})
        ]
        ax.plot(*zip(*points), marker=".", alpha=0.7, label=f"client {cid}")
    ax.plot(rounds, global_acc, color="black", linewidth=2.5, label="global model")
    ax.set(xlabel="round", ylabel="accuracy", title="Clients' accuracy vs the global model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "client_accuracy.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--output", default="runs/keras-blog")
    parser.add_argument("--backend", default="process")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # workers import keras_blog
    from pollinate import config
    from pollinate.experiment import run_experiment

    cfg = config.from_dict(
        {
            "run": {"name": "keras-blog", "rounds": args.rounds, "output": args.output},
            "data": {"dataset": "fashion-mnist", "num_clients": args.clients},
            "model": {"framework": "keras", "name": "keras_blog:create_model"},
            "train": {"epochs": args.epochs, "batch_size": 32},
            # every client every round; a shared or slow CPU needs a generous round deadline
            "strategy": {"min_train_clients": args.clients, "round_timeout_s": 7200.0},
            "simulation": {"backend": args.backend, "workers": 2},
        }
    )
    result = run_experiment(cfg, quiet=False)
    history = result.history.to_dict()
    plot(history, cfg.output_dir)
    final = history["rounds"][-1]["centralized"]["accuracy"]
    print(f"global accuracy after {args.rounds} rounds: {final:.4f}")


if __name__ == "__main__":
    main()
