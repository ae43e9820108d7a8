from setuptools import find_packages, setup

setup(
    name="agentd",
    version="0.1.0",
    description="Production gateway between browsers and AI coding agents on project VMs",
    python_requires=">=3.11",
    packages=[*find_packages(include=["agentd", "agentd.*"]), "twisted.plugins"],
    package_data={
        "agentd": ["static/*"],
        "twisted.plugins": ["agentd_plugin.py"],
    },
    install_requires=[
        "twisted[conch,tls]>=24.3",
        "autobahn>=24.4",
        "txredisapi>=1.6",  # RedisFactory.startConnecting: agentd supplies the endpoints
        "hiredis>=2.2.1",  # txredisapi parses replies with it; agentd encodes commands with it
        "prometheus-client>=0.20",
        "pyopenssl>=24",
        "service-identity>=24",
        "pyjwt[crypto]>=2.8",
        "cryptography>=42",
        "orjson>=3.10",
    ],
    extras_require={
        "agent": ["anthropic>=0.40", "openai>=1.50"],
        # make bench: the charts it draws and the profiler its --profile option runs.
        "bench": ["matplotlib>=3.8", "py-spy>=0.3.14"],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pyyaml>=6",
            "treq>=24",
            "playwright>=1.45",
            "ruff>=0.6",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "anthropic>=0.40",
            "openai>=1.50",
            "openapi-spec-validator>=0.7",
            "schemathesis>=4",
        ],
    },
    entry_points={
        "console_scripts": [
            "agentd = agentd.cli:main",
            "agentd-agent = agentd.agent.entry:main",
        ]
    },
)
