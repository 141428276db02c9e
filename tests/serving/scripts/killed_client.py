"""A client that starts a sequence, runs one frame, says so and sleeps until
killed: ``python killed_client.py URL`` (tests/serving/test_serving_server.py)."""

import sys
import time

import numpy as np

from banded_rnn.serving import Client


def main(url: str) -> None:
    client = Client(url)
    client.start("doomed")
    client("doomed", np.zeros(client.frame_shape, np.float32))
    print("running", flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main(sys.argv[1])
