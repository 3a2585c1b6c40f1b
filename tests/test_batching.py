"""bench.data.batching: the rules both backends share give what each backend computed before."""

import numpy as np
import pytest

from bench.data import batching


@pytest.mark.parametrize("n,batch_size", [(1, 4), (3, 4), (4, 4), (5, 4), (9, 4), (10, 3)])
def test_tile_indices_match_np_resize_and_torch_repeat(n, batch_size):
    inputs = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    tiled = inputs[batching.tile_indices(n, batch_size)]
    # the Keras side's former np.resize
    assert np.array_equal(tiled, np.resize(inputs, (batch_size, 2, 3)))
    # the PyTorch side's former [:bs] + repeat(reps) + [:bs], written in numpy
    head = inputs[:batch_size]
    reps = -(-batch_size // len(head))
    assert np.array_equal(tiled, np.concatenate([head] * reps)[:batch_size])


@pytest.mark.parametrize("n,batch_size,shuffle,used,batches",
                         [(9, 4, True, 8, 2), (9, 4, False, 9, 3), (8, 4, True, 8, 2),
                          (1, 4, True, 0, 0), (10, 4, True, 10, 3)])
def test_lone_last_batch_rule(n, batch_size, shuffle, used, batches):
    assert batching.used_items(n, batch_size, shuffle) == used
    assert batching.num_batches(used, batch_size) == batches
    sizes = [batching.batch_items(i, used, batch_size) for i in range(batches)]
    assert sum(sizes) == used and all(0 < s <= batch_size for s in sizes)


def test_load_file(tmp_path):
    from PIL import Image
    p = tmp_path / "grey.png"
    Image.fromarray(np.full((10, 7), 90, dtype=np.uint8)).save(p)
    x = batching.load_file(str(p), 5)
    assert x.shape == (5, 5, 3) and x.dtype == np.uint8 and (x == 90).all()
