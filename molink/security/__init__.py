"""Who may join a swarm and drive its stages.

* :mod:`~molink.security.swarm_key`: the shared secret every member holds, and the keys derived
  from it.
* :mod:`~molink.security.grpc_tls`: mutual TLS for every gRPC call, from a certificate derived
  from the swarm key.
* :mod:`~molink.security.dht_admission`: DHT requests carry a token only swarm-key holders can
  make.
* :mod:`~molink.security.node_key`: each node's own signing key (signed announcements, proof that
  the process at an announced address is the node that announced it).
* :mod:`~molink.security.settings`: key file paths from the flags, and the exposure check.
* :mod:`~molink.security.swarm_security`: the loaded keys, and the transports built from them.
"""
