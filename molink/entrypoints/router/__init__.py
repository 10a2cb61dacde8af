"""The router: one OpenAI endpoint in front of every head of a swarm.

``python -m molink.entrypoints.router --initial_peer HOST:PORT --port 8080`` (or
``molink router ...``) finds the heads in the DHT (:mod:`.heads`), sends each request to the
ready head with the least outstanding work, and when a head dies mid-request sends the rest of
it to another head, stitching both parts into one stream (:mod:`.stitching`). The HTTP side is
:mod:`.proxy`; the command line is :mod:`.__main__`.
"""
