"""Training that learns on a user's own data: released weights fetched as the original fetches them,
a from-scratch recipe that learns on a data set unlike the demo's, and what a run reports."""
import copy
import functools
import http.server
import json
import threading

import numpy as np
import pytest
import torch
from conftest import load_schema
from PIL import Image

import export
import model
import predict
import support
import train_det as td

# A user's data set as the demo never sees it: other shapes, non-contiguous category ids, a quarter of
# the images grayscale, sides from half to 1.25 times the training size.
USER_SHAPES = {2: "star", 5: "sparkle", 9: "hexagon"}


def make_user_set(root, num_train=240, num_val=48, img_size=256, seed=2026, ids=tuple(USER_SHAPES)):
    """Write the user-like data set under root (COCO layout); `ids` relabels the three shapes (the
    original code needs 0..N-1)."""
    shapes = dict(zip(ids, USER_SHAPES.values()))
    draw = functools.partial(support._synthetic_image, shapes=shapes, sizes=(0.5, 1.25), gray=0.25)
    categories = [dict(id=c, name=name, supercategory="shape") for c, name in shapes.items()]
    return support.make_synthetic_coco(root, num_train, num_val, img_size, seed, draw=draw, categories=categories)


# ---- Released weights, served from 127.0.0.1 ----

class Server(http.server.ThreadingHTTPServer):
    """Serves `files` {name: bytes}; a name in `cut` gets its full Content-Length but half its bytes."""

    def __init__(self):
        self.files, self.cut, self.requests = {}, set(), []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        if name not in self.server.files:
            self.send_error(404)
            return
        body = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if name in self.server.cut else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A release server on 127.0.0.1 standing in for GitHub, and an empty torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    srv = Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setattr(support, "RELEASE_URL", srv.url)
    yield srv
    srv.shutdown()
    srv.server_close()


def saved(obj, tmp_path):
    torch.save(obj, tmp_path / "file.pth")
    return (tmp_path / "file.pth").read_bytes()


def ecvit(preset):
    """A state dict shaped as the released ECViT of `preset` (an ecvit*.pth file), every float 0.5."""
    shapes = load_schema(preset)["backbone_weights_file_state_dict"]
    return {k: torch.full(shape, 0.5) if shape else torch.tensor(0) for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def ecdet_s():
    return model.build_model("ecdet_s")


def backbone_args(*extra, preset="ecdet_s"):
    return td.parse_args(["--model", preset, *extra])


def test_a_preset_starts_from_its_released_ecvit_downloaded_once(server, tmp_path, ecdet_s):
    server.files["ecvitt.pth"] = saved(ecvit("ecdet_s"), tmp_path)
    for _ in range(2):
        assert support.initial_backbone(ecdet_s, model.preset_config("ecdet_s"), backbone_args(), 0, model.ECVIT)
    assert all((v == 0.5).all() for v in ecdet_s.backbone.backbone.parameters())
    assert server.requests == ["ecvitt.pth"]  # the second time reads torch hub's cache
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "ecvitt.pth").is_file()
    # ECSeg and ECPose presets name their own task's distilled ECViT, as the original
    assert support.released_backbone(model.preset_config("ecseg_m"), model.ECVIT) == server.url + "ecseg_vittplus.pth"
    assert support.released_backbone(model.preset_config("ecpose_x"), model.ECVIT) == server.url + "ecpose_vitsplus.pth"


def test_configs_without_a_released_vit_train_it_from_random_weights_at_the_head_rate(server, capsys):
    small = td.demo_config()  # a 64-wide ECViT named ecvitt: no released weights fit it
    assert support.released_backbone(small, model.ECVIT) is None
    skip = model.preset_config("ecdet_s")
    skip["ViTAdapter"]["skip_load_backbone"] = True
    assert support.released_backbone(skip, model.ECVIT) is None
    args = backbone_args("--backbone-weights", "none")
    assert not support.initial_backbone(None, model.preset_config("ecdet_s"), args, 0, model.ECVIT)
    assert server.requests == []
    assert capsys.readouterr().out == ("backbone: random initial weights (--backbone-weights none), trained at "
                                       "the head's learning rate\n")


def test_offline_fails_at_once_naming_the_url_and_the_ways_around(monkeypatch, tmp_path, ecdet_s):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(support, "RELEASE_URL", "http://127.0.0.1:9/")  # the discard port: nothing listens
    with pytest.raises(ConnectionError) as e:
        support.initial_backbone(ecdet_s, model.preset_config("ecdet_s"), backbone_args(), 0, model.ECVIT)
    message = str(e.value)
    assert "cannot download http://127.0.0.1:9/ecvitt.pth" in message and "\n" not in message
    assert "--backbone-weights FILE" in message and "--backbone-weights none" in message


def test_a_download_cut_half_way_leaves_nothing_in_the_cache(server, tmp_path):
    server.files["ecvitt.pth"] = saved(ecvit("ecdet_s"), tmp_path)
    server.cut.add("ecvitt.pth")
    with pytest.raises(ConnectionError, match="ended after .* bytes"):
        support.download(server.url + "ecvitt.pth", "hint")
    assert list((tmp_path / "torch_home" / "hub" / "checkpoints").iterdir()) == []


def test_a_cached_file_that_does_not_load_is_named_and_fetched_again_once(server, tmp_path, capsys):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "ecvitt.pth").write_bytes(b"not a checkpoint")
    server.files["ecvitt.pth"] = saved({"register_token": torch.ones(3)}, tmp_path)
    assert torch.equal(support.download(server.url + "ecvitt.pth", "hint")["register_token"], torch.ones(3))
    assert f"the cached {cache / 'ecvitt.pth'} does not load" in capsys.readouterr().out
    (cache / "ecvitt.pth").write_bytes(b"not a checkpoint")
    server.files["ecvitt.pth"] = b"still not a checkpoint"
    with pytest.raises(ValueError, match="ecvitt.pth, downloaded again from .* does not load"):
        support.download(server.url + "ecvitt.pth", "hint")
    assert server.requests == ["ecvitt.pth"] * 2


def test_a_backbone_file_of_another_ecvit_size_names_both_sizes(tmp_path, ecdet_s):
    torch.save(ecvit("ecdet_m"), tmp_path / "ecvittplus.pth")
    with pytest.raises(ValueError, match=r"--backbone-weights .*ecvittplus.pth holds ecvittplus \(256 wide, 12 "
                                         r"blocks\); the model needs ecvitt \(192 wide, 12 blocks\)"):
        support.initial_backbone(ecdet_s, model.preset_config("ecdet_s"),
                                 backbone_args("--backbone-weights", str(tmp_path / "ecvittplus.pth")), 0, model.ECVIT)


def test_tune_with_a_preset_name_downloads_the_released_model(server, tmp_path):
    sd = {"ema": {"module": {"decoder.up": torch.tensor([0.5])}}}
    server.files["ecdet_s.pth"] = saved(sd, tmp_path)
    assert support.released_checkpoint("ecdet_s", model.PRESETS)["ema"]["module"]["decoder.up"].item() == 0.5
    assert server.requests == ["ecdet_s.pth"]
    with pytest.raises(ValueError, match="unknown released model 'ecdet_q'"):
        support.released_checkpoint("ecdet_q", model.PRESETS)


def test_predict_with_a_preset_name_runs_the_released_model(server, tmp_path, ecdet_s):
    server.files["ecdet_s.pth"] = saved({"ema": {"module": ecdet_s.state_dict()}}, tmp_path)
    p = predict.Predictor("ecdet_s", conf=0.0)
    [result] = p(np.zeros((64, 80, 3), np.uint8))
    assert server.requests == ["ecdet_s.pth"] and len(result["boxes"]) > 0
    assert result["names"][0] in support.COCO_NAMES  # a released checkpoint gets COCO's names


# ---- What a run reports: the per-class table, log.jsonl, curves.png ----

def test_per_class_ap_names_each_category_as_the_original_tabulates_it(tmp_path, capsys):
    root = make_user_set(str(tmp_path / "user"), num_train=0, num_val=12, img_size=96)
    ds = td.CocoDetection(f"{root}/val2017", f"{root}/annotations/instances_val2017.json")
    evaluator = predict.CocoEvaluator(ds.coco, ds.label_to_cat)
    for image_id in ds.ids:  # every object found, but no star
        objects = [a for a in ds.coco.imgToAnns[image_id] if a["category_id"] != 2]
        boxes = torch.tensor([a["bbox"] for a in objects]).reshape(-1, 4)
        evaluator.update([image_id], [dict(labels=torch.tensor([ds.cat_to_label[a["category_id"]] for a in objects],
                                                               dtype=torch.int64),
                                           boxes=torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1),
                                           scores=torch.ones(len(objects)))])
    stats = evaluator.summarize()
    assert stats["bbox_per_class"] == {"star": [0.0, 0.0], "sparkle": [1.0, 1.0], "hexagon": [1.0, 1.0]}
    table = capsys.readouterr().out.split("### Class-wise Evaluation Metrics ###")[1].splitlines()
    assert table[2].split() == ["|", "class", "|", "bbox-AP", "|", "bbox-AP50", "|"]
    assert table[4].split() == ["|", "star", "|", "0.00", "|", "0.00", "|"]
    assert table[5].split() == ["|", "sparkle", "|", "100.00", "|", "100.00", "|"]


def test_curves_png_draws_each_loss_term_and_ap_per_epoch(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    entries = [{"epoch": e + 1, "loss": 10.0 - e, "coco_bbox": [0.1 * e, 0.2 * e] + [0.0] * 10,
                "losses": {"loss_mal": 1.0, "loss_mal_aux_0": 1.0, "loss_mal_dn_pre": 1.0, "loss_giou_enc_0": 7.0 - e}}
               for e in range(3)]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    drawn, draw = [], support.draw_curves
    monkeypatch.setattr(support, "draw_curves", lambda panels, path: drawn.append(panels) or draw(panels, path))
    support.draw_log(str(log), str(tmp_path / "curves.png"))
    (loss_title, losses), (ap_title, ap) = drawn[0]
    assert losses == {"total": [10.0, 9.0, 8.0], "loss_mal": [3.0] * 3, "loss_giou": [7.0, 6.0, 5.0]}
    assert ap == {"bbox AP": [0.0, 0.1, 0.2], "bbox AP50": [0.0, 0.2, 0.4]}
    image = Image.open(tmp_path / "curves.png")
    assert image.size == (960, 320) and len(image.getcolors(1 << 16)) > 3  # lines in colours, not a blank page


# ---- Training on the user's set ----

@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.json"
    path.write_text(json.dumps(td.demo_config()))
    return str(path)


def test_a_random_vit_trains_at_the_head_rate_and_restarts_from_the_best_epoch(tmp_path, small_config, monkeypatch,
                                                                               capsys):
    """A short run with --backbone-weights none on the user-like set and a recipe whose backbone rate
    is a preset's (2.5e-5): the run raises it to the head's and says so, reports per-class AP every
    epoch, and starts its last (unaugmented) epoch from the best one. That such a run learns is the
    README's 24-epoch measurement (too long for the suite); test_train_det's short run fits."""
    root = make_user_set(str(tmp_path / "user"), num_train=8, num_val=4, img_size=64, seed=3)
    monkeypatch.setitem(td.RECIPES, "short", dict(zip(td._RECIPE, (3, 1e-3, 2.5e-5, 1e-4, 0.0, 0, 2))))
    aps, evaluate = iter([0.5, 0.1, 0.2]), td.evaluate  # epoch 1 is the best when augmentation stops
    monkeypatch.setattr(td, "evaluate", lambda *args: {**evaluate(*args), "bbox": [next(aps)] + [0.0] * 11})
    starts, train = [], td.train_one_epoch
    monkeypatch.setattr(td, "train_one_epoch", lambda net, *args: starts.append(copy.deepcopy(net.state_dict()))
                        or train(net, *args))
    out = tmp_path / "out"
    td.train(td.parse_args(["--data", root, "--model", small_config, "--recipe", "short", "--backbone-weights", "none",
                          "--img-size", "64", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                          "--output-dir", str(out)]))
    printed = capsys.readouterr().out
    assert printed.startswith("backbone: random initial weights (--backbone-weights none), trained at the head's")
    groups = torch.load(out / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert {g["initial_lr"] for g in groups} == {1e-3}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [set(entry["coco_bbox_per_class"]) for entry in log] == [{"star", "sparkle", "hexagon"}] * 3
    assert printed.count("### Class-wise Evaluation Metrics ###") == 3 and (out / "curves.png").is_file()
    # epoch 3 starts where epoch 2 did (from epoch 1's weights), not where epoch 2 ended
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["epoch"] == 1 and all(torch.equal(starts[2][k], v) and torch.equal(starts[1][k], v)
                                      for k, v in best["model"].items())
    assert f"strong augmentation off: continuing from {out / 'best.pth'} (epoch 1, AP 0.5000)" in printed


# ---- Fine-tuning a released model on the user's classes ----

@pytest.mark.parametrize("preset", model.PRESETS)
def test_only_the_class_heads_follow_the_number_of_classes(preset):
    cfg = model.preset_config(preset)
    heads = td.class_heads(cfg)
    assert heads and all(k.startswith("decoder.") and ("class" in k or "score" in k) for k in heads), heads


def test_tune_a_released_model_on_other_classes_keeps_all_but_the_class_heads(server, tmp_path, ecdet_s, capsys):
    server.files["ecdet_s.pth"] = saved({"ema": {"module": ecdet_s.state_dict()}}, tmp_path)
    args = td.parse_args(["--model", "ecdet_s", "--tune", "ecdet_s", "--device", "cpu"])
    support.start_run(args)
    cfg = support.model_config(args, td.ECCriterion.preset_config, 3)
    net = model.build_model(cfg)
    support.tune_weights(net, args, model.PRESETS, td.class_heads(cfg), 3, 0)
    [line] = [line for line in capsys.readouterr().out.splitlines() if "classes there" in line]
    assert line.startswith("--tune ecdet_s: 80 classes there, 3 in this data set: the ViT, encoder and decoder start "
                           "from its weights, the class heads afresh (decoder.")
    released, heads = ecdet_s.state_dict(), td.class_heads(cfg)
    for k, v in net.state_dict().items():
        assert (k in heads) == (v.shape != released[k].shape), k
        if k not in heads:
            assert torch.equal(v, released[k]), k
    assert net.decoder.enc_score_head.weight.shape == (3, 192)


def test_export_with_a_preset_name_downloads_the_released_model(server, tmp_path, ecdet_s, capsys):
    server.files["ecdet_s.pth"] = saved({"ema": {"module": ecdet_s.state_dict()}}, tmp_path)
    export.main(["--weights", "ecdet_s", "--flops", "--img-size", "128"])
    assert server.requests == ["ecdet_s.pth"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("ecdet_s: 9,884,102 parameters")
