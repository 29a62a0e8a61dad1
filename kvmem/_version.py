"""The package version, in a module of its own so infrastructure modules can record it without importing the
package face (`kvmem/__init__.py`), which imports them."""

__version__ = "0.1.0"
