"""The TP rendezvous port comes from outside the kernel's ephemeral range, where every connect()
and bind-to-0 on the machine draws its port (a port from that range was taken once in CI between
our check and rank 0's listen)."""

import socket

from parallel.worker import RENDEZVOUS_PORTS, _free_port


def test_rendezvous_port_is_free_and_below_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    assert RENDEZVOUS_PORTS.stop <= ephemeral_low
    for _ in range(5):
        port = _free_port()
        assert port in RENDEZVOUS_PORTS
        with socket.socket() as s:
            s.bind(("", port))  # nobody holds it
