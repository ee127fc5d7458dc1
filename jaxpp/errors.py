"""The one exception type jaxpp raises for bad input.

Every user-facing mistake (a missing file, a tensor of the wrong shape, a prompt longer than
the context, an impossible mesh) becomes a `JaxppError` whose message is a single line naming
what is wrong, so command lines can print it without a traceback from deep inside JAX.
"""


class JaxppError(ValueError):
  """Bad input or configuration; the message is one line naming what is wrong."""
