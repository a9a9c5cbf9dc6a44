from ..helpers import double  # relative import two levels down


def quadruple(x):
    return double(double(x))
