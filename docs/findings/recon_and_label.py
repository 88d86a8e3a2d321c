"""Two checks on a finished LM run, the ones that explained the budget search (docs/findings.md):

1. does the Llama use the class token? Val bits per image with the true class, a shuffled class
   and the null class (the same as ``lm/val_label_bits``, which runs log since this search);
2. can the tokenizer's codes carry the class at all? The probe's accuracy on real val images and
   on their reconstructions (the same as ``tok/class_accuracy``, also logged since).

    LMGEN_HOME=... python docs/findings/recon_and_label.py RUN_ID [--images 256] [--grid recon.png]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from lmgen.experiment import _probe, restore_run


def bits_per_image(run, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, null: bool = False) -> float:
    """Mean over images of the summed NLL (bits) of their tokens, prompted by ``labels`` (or the null class)."""
    seq = run.layout.sequences(ids, lengths, labels)
    if null:
        seq[:, 0] = run.layout.null_class
    with torch.no_grad():
        logits = run.model(seq[:, :-1])
    targets = seq[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    return float((nll * (targets != run.layout.pad)).sum(1).mean()) / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--images", type=int, default=256, help="val images to score")
    parser.add_argument("--grid", help="write originals over reconstructions (20 of each) to this PNG")
    args = parser.parse_args()
    run = restore_run(args.run_id)
    torch.manual_seed(0)
    n = min(args.images, len(run.val_ds))
    images = torch.stack([run.val_ds[i][0] for i in range(n)])
    labels = torch.tensor([run.val_ds[i][1] for i in range(n)])
    tokens = run.tokenizer.encode(images)
    shuffled = labels[torch.randperm(n)]
    print(f"{n} val images, {float(tokens.lengths.float().mean()):.0f} tokens each")
    for name, prompt, null in (("true class", labels, False), ("shuffled class", shuffled, False),
                               ("null class", labels, True)):
        print(f"  val bits/image, {name:<14} {bits_per_image(run, tokens.ids, tokens.lengths, prompt, null):8.1f}")
    probe = _probe(run.cfg.metrics, run.train_ds, run.val_ds, run.home)
    recon = run.tokenizer.decode(tokens).images
    for name, batch in (("real images", images), ("reconstructions", recon)):
        print(f"  probe accuracy on {name:<16} {float((probe.predict(batch) == labels).float().mean()):.3f}")
    if args.grid:
        import torchvision

        torchvision.utils.save_image(torch.cat([images[:20], recon[:20]]).float() / 255, args.grid, nrow=20)


if __name__ == "__main__":
    main()
