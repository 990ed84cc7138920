"""Client-side building blocks: mods for any Flower ClientApp, outermost first::

    app = ClientApp(mods=[downlink_mod, secagg_mod, compress_mod])

Each is a no-op unless the server's message asks for it.
"""

from fedsqueeze.client.layers import layers_mod
from fedsqueeze.client.mods import compress_mod, downlink_mod
from fedsqueeze.client.secure import secagg_mod

__all__ = ["compress_mod", "downlink_mod", "layers_mod", "secagg_mod"]
