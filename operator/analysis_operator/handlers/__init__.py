"""kopf handlers; importing this package registers them."""
from analysis_operator.handlers import admission, environments, indexes, lifecycle  # noqa: F401
