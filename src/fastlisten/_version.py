"""fastlisten's release, in a module of its own so that modules below the
package (``sysinfo``) can name it without importing the package.  It is
``fastlisten.VERSION``: the package's ``__version__`` is socketserver's, as
the drop-in must give it."""

VERSION = "0.1.0"
