"""dts — a data transfer station for image AI in the hospital.

Stages hand work to each other through a filesystem spool (see ``dts.spool``):
``receiver`` -> ``classifier`` -> ``runner`` -> ``sender``, every step an event in
the ``journal``.
"""

__version__ = "0.1.0"
