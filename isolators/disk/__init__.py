"""The disk isolator (Mesos' disk/du and disk/xfs): du.py measures trees in bounded passes,
quota.py sets project quotas, isolator.py chooses between them per container."""
