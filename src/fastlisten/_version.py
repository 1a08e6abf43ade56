"""fastlisten's release, in a module of its own so that modules below the
package (``sysinfo``) can name it without importing the package."""

__version__ = "0.1.0"
