"""The server's loop reads a worker's connection without blocking: ``_FrameReader`` must split exactly what
``multiprocessing``'s ``Connection.send`` writes into messages, however the bytes arrive."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading

from kiln.workers.local import _FrameReader


def test_frames_of_connection_send_are_split_in_order_however_they_arrive():
    a, b = mp.Pipe()
    msgs = [("event", i, "x" * (i % 97)) for i in range(3000)] + [("done", b"y" * 300_000)]
    sender = threading.Thread(target=lambda: ([a.send(m) for m in msgs], a.close()))
    sender.start()
    reader = _FrameReader(b.fileno())
    got, reads = [], 0
    try:
        while True:
            frames = reader.read()  # a read may end mid-frame: the rest comes with a later read
            reads += 1
            got += [pickle.loads(f) for f in frames]
    except EOFError:
        pass
    sender.join()
    b.close()
    assert got == msgs
    assert reads > 1 and reader.buf == bytearray()
