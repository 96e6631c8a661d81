"""Lightning's BackboneFinetuning through a wrapped optimizer: the backbone, frozen when the
optimizer is built, is added with ``add_param_group`` at its unfreeze epoch, trains from then
on and joins the probe's blocks."""

import warnings

import pytest
import torch
from torch import nn

import blockopt

pl = pytest.importorskip("pytorch_lightning")


class _Net(pl.LightningModule):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.probe_batch = (x[:64], y[:64])

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        sgd = torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
        x, y = self.probe_batch
        return blockopt.wrap(
            sgd, self, lambda: nn.functional.mse_loss(self(x), y), probe_every=8, lr_search=False
        )


def test_backbone_finetuning_trains_the_unfrozen_backbone_and_probes_it():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (2 * x[:, :1] - x[:, 1:2]).tanh()
    net = _Net(x, y)
    start = [p.detach().clone() for p in net.backbone.parameters()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, blockopt.BlockOptimizer) and len(opt.param_groups) == 2
    # the callback's group (at a fraction of the head's rate) is applied as it sets it
    assert opt.mode == "sgd" and opt.applied_lrs == [g["lr"] for g in opt.param_groups]
    assert opt.applied_lrs[0] == 0.05 and 0 < opt.applied_lrs[1] < 0.05
    assert all(not torch.equal(a, b) for a, b in zip(start, net.backbone.parameters()))
    names = [b.name for b in opt.blocks]
    assert names == ["backbone.0.weight", "backbone.0.bias", "head.weight", "head.bias"]
    assert set(opt.block_factors) == set(names)
    assert set(opt.spectra_history[-1][1]) == set(names)
