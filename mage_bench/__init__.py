"""mage-bench: train, sweep and evaluate MAGE (MAsked Generative Encoder).

Heavy dependencies (torch, torchvision) are imported inside the modules that need them, so
`import mage_bench` and `mage-bench --help` stay instant.
"""

__version__ = "0.1.0"
