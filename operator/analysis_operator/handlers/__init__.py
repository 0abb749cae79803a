"""kopf handlers; importing this package registers them."""
from analysis_operator.handlers import admission, budgets, datasets, environments, indexes, lifecycle  # noqa: F401
