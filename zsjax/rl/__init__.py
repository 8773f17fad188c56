"""Rewards, advantages, losses and the policy update."""
